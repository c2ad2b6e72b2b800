"""Datasets and LightningDataModules: VOC-2007, COCO-2014, image folders, and the embedded benchmark."""

from explainer.data import synthetic
from explainer.data.base import VOID, ImageDataModule, build_transforms, read_rgb
from explainer.data.coco import COCODataModule, COCODataset
from explainer.data.folder import FolderDataModule, FolderDataset
from explainer.data.voc import VOC_CLASSES, SyntheticDataModule, VOCDataModule, VOCDataset

__all__ = ["synthetic", "VOID", "ImageDataModule", "build_transforms", "read_rgb", "COCODataModule",
           "COCODataset", "FolderDataModule", "FolderDataset", "VOC_CLASSES", "SyntheticDataModule",
           "VOCDataModule", "VOCDataset"]
